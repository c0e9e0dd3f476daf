"""One module per bench section; each `run_*` function takes the parsed options and fills the results dict."""
