"""mpigpt2: an llm.c-exact GPT-2 trainer in numpy with data + pipeline parallelism over MPI."""

from mpigpt2.base import blas as _blas

# before anything imports numpy: OpenBLAS reads its kernel choice when it loads
_blas.CHOICE = _blas.select()

__version__ = "0.1.0"
