"""`python -m bench.peers`: the calibrated-quantization-vs-peers benchmark (bench/peers/compare.py)."""

from bench.peers.compare import main

raise SystemExit(main())
