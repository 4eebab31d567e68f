"""The fused ops: one op per file, each with its PyTorch reference beside the fast paths.

* ``activation``       - the activations a block may use, and their reference.
* ``batchnorm``        - BatchNorm bookkeeping shared by both blocks (what nn.BatchNorm2d does
                         around F.batch_norm), and the statistics format and finalize step.
* ``depthwise_block``  - y = x + BN(act(dwconv(x) + b))
* ``pointwise_block``  - z = BN(act(conv1x1(r) + b))
"""
