"""Device meshes and expert-parallel dispatch."""
