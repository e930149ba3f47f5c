"""Model storage: the on-disk store, the cache of converted models, the vetting child that converts
uploads in a resource-limited process, and the seeding of the bundled models."""
