"""The rehearsal end to end, cold and warm."""
