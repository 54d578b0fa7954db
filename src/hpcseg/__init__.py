"""hpcseg: train and test a MONAI 2D U-Net for brain tissue segmentation, locally or as cluster jobs."""

__version__ = "0.1.0"

#: Label values of a slice: 0 background, then the three tissues.
TISSUES = ("csf", "grey_matter", "white_matter")
