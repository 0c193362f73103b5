"""The bridge layer: portals, ghosts, logins, the message map, relay, commands
and formatting, on the durable inbox, the room-state store and the bulk engine.

A bridge implements :class:`~bridge_kit.bridge.connector.NetworkConnector` for its
network; :class:`~bridge_kit.bridge.bridge.Bridge` does the rest.

Nothing is imported here: the stores build on :mod:`~bridge_kit.bridge.records`,
and the layer itself on the stores.
"""
