"""Editor families behind one interface (`rcgrpo.editors.base.Editor`): one subpackage per family."""
