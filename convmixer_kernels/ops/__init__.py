"""The fused ops: one interface file per op, one file per backend beneath it.

* ``depthwise_block``  - y = x + BN(act(dwconv(x) + b)): reference, front function, torch.library
                         ops, autograd formula and registry entry (the contract every backend follows)
* ``pointwise_block``  - z = BN(act(conv1x1(r) + b)), likewise
* ``batchnorm``        - BatchNorm bookkeeping (what nn.BatchNorm2d does around F.batch_norm), the
                         statistics formats, the running-buffer update and the backward coefficients
* ``activation``       - the activations a block may use, and their reference
* ``dispatch``         - the one path every call takes: checks, autocast, the (cached) backend choice
* ``triton/``          - the Triton backend: ``depthwise.py``, ``pointwise.py`` and their shared
                         ``common.py`` (interpreter detection, autotuner, fixed-order sums), ``batchnorm.py``,
                         ``activation.py``
* ``cuda/``            - the CUDA-extension backend: ``depthwise.py`` (csrc/ kernels)
"""
