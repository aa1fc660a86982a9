"""Every numeric tolerance of the test suite, named in one place."""

FD_RTOL = 1e-6          # float64 analytic gradient vs central finite differences (relative)
FD_STEP = 1e-6          # central difference step
TORCH64_ATOL = 1e-10    # float64 model vs PyTorch float64 autograd (loss, gradients)
TORCH32_RTOL = 1e-4     # float32 gradients vs PyTorch float64, relative to each tensor's max
TORCH32_LOSS = 1e-5     # float32 loss vs PyTorch float64
F32_VS_F64_LOSS = 1e-4  # ten AdamW steps: float32 losses vs a float64 run
ADAM_RTOL = 1e-6        # our AdamW update vs torch.optim.AdamW (float64)
PARITY_F64 = 1e-10      # any parallel layout vs one process, float64, relative
PARITY_F32 = 1e-5       # same, float32
PARITY_F32_ADAM = 1e-2  # float32 final parameters after Adam: fraction of lr·steps (absolute)
HF_ATOL = 1e-5         # our logits/loss vs transformers GPT2LMHeadModel, float32
