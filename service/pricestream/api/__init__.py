"""The pod's front door: the gRPC service, its server, auth, TLS, reflection and the HTTP side."""
