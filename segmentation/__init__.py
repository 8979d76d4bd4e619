"""Brain-tumour segmentation: reversible MBConv 3D U-Net, BraTS data, training, inference and metrics.

Kept import-light on purpose (no torch here) so `histo --help` stays fast; import the submodules you need.
"""
