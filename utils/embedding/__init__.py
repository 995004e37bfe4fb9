"""The one embedding stack: test-time views, batched embedding, the on-disk array cache, and
the step every model script ends with (embed the four image sets -> two similarity matrices)."""
