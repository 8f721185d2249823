"""jetbatch benchmarks (`just bench [names]`): each prints its figures beside the baseline it
measures in the same run, and writes them as JSON under bench/results/."""
