"""Model-release checks for CI: parity at every tap, a visual report, drift from a baseline.

``check.run_check`` computes, ``report.write_report`` writes report.html and check.json; the CLI
(``preimage check``) and the CheckRelease RPC are thin layers over these two.
"""
