"""Audio data: the embedded synthetic default, decoding and resampling, collation."""
