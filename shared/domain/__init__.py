"""Domain code that two services share, named as such so that the rest of shared/ stays plumbing."""
