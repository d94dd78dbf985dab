"""The `batchinfer` command, above the flows: it starts runs in this process or serves the flow."""
