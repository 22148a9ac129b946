"""Median over steps and contexts of forecast / reuse error per (spacing, gap), from traces
profiled with forecast_probe.patch applied (``load_profile(...).forecast_error``)."""

import sys

import numpy as np

from ditplan.policy.load_profile import load_profile

profile = load_profile(sys.argv[1])
table = profile.forecast_error  # [C, T, M, G, 3]: reuse, order 1, order 2
print("shape", table.shape)
for spacing in range(1, table.shape[2] + 1):
    row = []
    for gap in range(1, min(spacing, table.shape[3]) + 1):
        errors = table[:, :, spacing - 1, gap - 1]  # [C, T, 3]
        ok = np.isfinite(errors).all(-1)
        f1 = np.median(errors[ok][:, 1] / errors[ok][:, 0])
        f2 = np.median(errors[ok][:, 2] / errors[ok][:, 0])
        row.append(f"g{gap}: F1/R {f1:.2f} F2/R {f2:.2f}")
    print(f"spacing {spacing}:", "; ".join(row))
