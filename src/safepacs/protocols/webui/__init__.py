"""The web UI for people, served by the HTTPS listener beside DICOMweb."""
