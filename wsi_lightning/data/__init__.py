"""Patient-level splits, batch types and the DataModules (manifests: ``wsi_lightning.manifest``)."""
