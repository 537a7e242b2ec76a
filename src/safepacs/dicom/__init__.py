"""Pure DICOM: Part 10 and file meta, the fast header reader, DICOM JSON, attributes, matching,
transcoding, rendering and bulk data; pydicom only, no I/O, no access checks, no audit."""
