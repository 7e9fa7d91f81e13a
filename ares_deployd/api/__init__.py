"""The HTTP API: a Falcon app, its authentication and its resources."""
