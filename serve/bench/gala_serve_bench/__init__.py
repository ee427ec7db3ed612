"""gala-serve's benchmark, outside the server wheel: ``python -m gala_serve_bench --help``.

``servers`` starts gala-serve and the MLServer peer, ``load`` drives closed-loop clients,
``flood`` measures overload, ``inprocess`` times the model alone, ORT vs torch and gala-batch;
``__main__`` wires them into the command and its report."""
