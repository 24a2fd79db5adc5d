"""Benchmarks of sparsecut: latency and memory against baselines (`bench`, also `sparsecut bench`) and a load
test of the demo server (`load_test`). Results go to benchmarks/results/."""
