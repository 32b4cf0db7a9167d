"""The benchmarks (``python bench/X.py``; docs/benchmarks.md). Not part of the installed
package; a package so that benchmarks, tools/ and tests import each other's pieces as
``bench.X`` from the repository root."""
