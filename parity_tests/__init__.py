"""The parity tests, installed as `vitparity.parity_tests` (run by `vitparity gate`)."""
