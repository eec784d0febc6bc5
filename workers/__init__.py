"""The worker side: the engine, the model and the Celery tasks that feed them.

MKL, torch's BLAS on x86 CPUs, may round one matrix product differently by
where in memory its operands and output lie. PyTorch's CPU attention kernel
(SDPA) multiplies in a scratch buffer of each thread, so a decoding row's
attention could round differently by which thread took it, that is by how many
rows shared its call: greedy text then depended on the batch, rarely and only
for some data (one of the 55 factual questions in a few rounds of staggered
arrivals). MKL's strict reproducible mode rounds alike wherever the operands
lie; it must be chosen before MKL's first call, so it is chosen here, before
anything of this package loads torch, unless the operator set ``MKL_CBWR``.
:func:`workers.kernels.mkl_mode` reads back what MKL took.
"""

import os

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
