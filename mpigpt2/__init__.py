"""mpigpt2: an llm.c-exact GPT-2 trainer in numpy with data + pipeline parallelism over MPI."""

__version__ = "0.1.0"
