"""Root conftest: the parity suite's options, fixtures and reporting live in vitparity.pytest_plugin."""

pytest_plugins = ["vitparity.pytest_plugin"]
