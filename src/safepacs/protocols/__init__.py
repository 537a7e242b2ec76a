"""The protocol adapters: DIMSE and DICOMweb, each independent of the other."""
