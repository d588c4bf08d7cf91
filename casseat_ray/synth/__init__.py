"""Data synthesis: the teacher cascade and the filters around it."""
