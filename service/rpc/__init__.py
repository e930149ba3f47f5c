"""The gRPC server: servicer, proto <-> domain messages, errors, auth, metrics, configuration and
the app that starts and stops it."""
