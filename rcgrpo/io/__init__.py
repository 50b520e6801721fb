"""Files and images: atomic writes (`files`), image and mask reading/writing (`images`), loading
pretrained weights from a local path or the hub with clear errors (`hub`)."""
