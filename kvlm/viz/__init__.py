"""`kvlm visualize`: record one generation step by step and replay it as a page and a plot."""
