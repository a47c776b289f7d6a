"""`cgpolicy explain`: what policies decide about one action, and which rule decides.

The decision itself comes from the reference evaluator (:mod:`cgpolicy.reference`); this
package parses the action (``actions``), finds the policies, from files (``explanation``)
or from what cgpolicy applied to a cgroup and its ancestors (``applied``), and renders
(``render``).
"""
