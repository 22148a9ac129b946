"""Quality-versus-speed benchmark: ditplan against the methods users would pick instead (issue 7).

Run ``python -m benchmarks.quality --out DIR [--quick] [--device cuda] [--scale wan1.3b]``.
"""
