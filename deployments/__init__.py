"""Ray Serve deployments on top of engines/: engine replicas, the router, the app and CLI."""
