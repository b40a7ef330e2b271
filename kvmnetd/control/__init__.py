"""The control surface: one method table from which the D-Bus objects, the control socket,
kvmnetctl and the introspection XML are derived."""
