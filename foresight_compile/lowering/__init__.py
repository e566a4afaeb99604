"""Compile-time lowering: segments (Inductor or eager, shared between equal blocks), the
segment plan, the graph form, and narrow Inductor workarounds."""
