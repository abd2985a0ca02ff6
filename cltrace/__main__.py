from cltrace import entry

raise SystemExit(entry())
