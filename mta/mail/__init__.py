"""The floor: vocabulary every package may use (addresses, replies, headers,
the DATA readers, DSN fields).  Imports nothing of ours; see README.rst, Layout."""
