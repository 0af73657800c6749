"""The simulator: configuration, the wire protocol, data and streams, the execution of clients, the round loop.

By layer, from the ground up (``docs/architecture.md``; the import contracts
in ``pyproject.toml`` check them): the base (``config``, ``seeding``,
``metrics``, ``run_dir``, ...), the driver-client ``protocol``, the plugin
``registry`` with the ``data`` and ``streams`` plugins, the execution of
clients (``client_state``, ``worker``, ``backends``, ``jobs``, ``grid``), the
run (``hooks`` and the hooks themselves, ``preflight``, ``plugins``,
``engine``), and the tools over run directories (``report``, ``plot``).
"""
