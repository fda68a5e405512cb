"""Raw log readers, validation and quarantine, synthetic search, splits and histories."""
