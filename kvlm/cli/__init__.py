"""The `kvlm` command line: `generate`, `chat` and `bench`, one module per command."""
