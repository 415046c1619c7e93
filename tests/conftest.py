import torch

# The test models are tiny: one thread computes them as fast as two, and several test processes (the
# distributed tests start their own) then never fight over the cores.
torch.set_num_threads(1)
