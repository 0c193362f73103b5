"""The durable inbox: what the homeserver pushes, stored, then handled in order.

The modules, in the order an event meets them:

- :mod:`~bridge_kit.inbox.transactions`: the front door: a transaction split,
  deduplicated, stored and acknowledged in one commit;
- :mod:`~bridge_kit.inbox.device_items`: to-device events, device lists and key
  counts out of a transaction;
- :mod:`~bridge_kit.inbox.records`: the inbox's records (items, dead letters,
  parked items) as the stores keep them;
- :mod:`~bridge_kit.inbox.items`: an item parsed into its model;
- :mod:`~bridge_kit.inbox.lanes`: :class:`~bridge_kit.inbox.lanes.Inbox`, which
  works through the items room by room;
- :mod:`~bridge_kit.inbox.handlers`: the registry of handlers an item is routed to;
- :mod:`~bridge_kit.inbox.delivery`: exactly-once sends from handlers;
- :mod:`~bridge_kit.inbox.parking`: items that wait outside their lane;
- :mod:`~bridge_kit.inbox.dead_letters`: listing, replaying and dropping dead letters.
- :mod:`~bridge_kit.inbox.signals`: ``NotReady`` and ``Park`` (what a preprocessor
  or handler raises to make an item wait), ``ErrorReply`` and ``TransactionFailed``
  (what the appservice API answers); signals, outside the error tree.

Nothing is imported here: the stores build on :mod:`~bridge_kit.inbox.records`,
and the inbox itself on the stores.
"""
