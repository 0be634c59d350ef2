"""Manifests, patient-level splits, batch types and the DataModules."""
