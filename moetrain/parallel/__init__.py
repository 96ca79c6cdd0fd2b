"""Device meshes and collectives: the mesh and its axis rules, multi-process start, the
ragged all-to-all plan."""
