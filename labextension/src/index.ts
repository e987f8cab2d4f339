import {
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import {
  CommandToolbarButton,
  ICommandPalette,
  Notification
} from '@jupyterlab/apputils';
import { DocumentRegistry } from '@jupyterlab/docregistry';
import {
  INotebookModel,
  INotebookTracker,
  NotebookPanel
} from '@jupyterlab/notebook';
import { checkIcon } from '@jupyterlab/ui-components';
import type { ReadonlyPartialJSONObject } from '@lumino/coreutils';
import type { CommandRegistry } from '@lumino/commands';
import { DisposableDelegate, IDisposable } from '@lumino/disposable';
import { ISignal, Signal } from '@lumino/signaling';

import { taskToCopy, verifyTooltip, whyVerifyIsDisabled } from './describe';
import { Federation, IVerifyResult } from './federation';
// The side panel is created in activate(), so it is needed at once.
// eslint-disable-next-line jupyter/prefer-lazy-imports
import { copyJoinLine, FederationPanel } from './panel';

namespace CommandIDs {
  export const verifyData = 'fedmagic:verify-data';
  export const showPanel = 'fedmagic:show-panel';
  export const stopTasks = 'fedmagic:stop-tasks';
  export const copyJoinLine = 'fedmagic:copy-join-line';
}

const CATEGORY = 'Federated Learning';

const NO_NOTEBOOK = 'Open a notebook whose kernel joined a task first';

/** What the commands take: no arguments. */
const NO_ARGS = { args: { type: 'object', properties: {} } };

/** Verify data takes the notebook whose toolbar it is in; else the current one. */
const NOTEBOOK_ARG = {
  args: {
    type: 'object',
    properties: {
      notebook: {
        type: 'string',
        description: 'The id of the notebook panel (default: the current one)'
      }
    }
  }
};

/** The Federation of each open notebook, ended when the notebook closes. */
class Federations {
  /** Emitted when any notebook's federation changes. */
  get changed(): ISignal<this, void> {
    return this._changed;
  }

  of(panel: NotebookPanel): Federation {
    let federation = this._byPanel.get(panel);
    if (federation === undefined) {
      const created = new Federation(panel.sessionContext);
      const relay = () => this._changed.emit();
      created.changed.connect(relay);
      panel.disposed.connect(() => {
        created.changed.disconnect(relay);
        created.dispose();
        this._byPanel.delete(panel);
      });
      this._byPanel.set(panel, created);
      federation = created;
    }
    return federation;
  }

  private _byPanel = new Map<NotebookPanel, Federation>();
  private _changed = new Signal<this, void>(this);
}

/**
 * The Verify data button in a notebook's toolbar, a view of the Verify data
 * command for that notebook: shown in participant notebooks (those whose
 * kernel joined a task, or that carry fedmagic metadata), disabled with the
 * reason as its tooltip while there is nothing to verify.
 */
class VerifyDataButton implements DocumentRegistry.IWidgetExtension<
  NotebookPanel,
  INotebookModel
> {
  constructor(commands: CommandRegistry) {
    this._commands = commands;
  }

  createNew(panel: NotebookPanel): IDisposable {
    const button = new CommandToolbarButton({
      commands: this._commands,
      id: CommandIDs.verifyData,
      args: { notebook: panel.id },
      label: 'Verify data'
    });
    button.addClass('fedmagic-verify-button');
    const update = () =>
      this._commands.notifyCommandChanged(CommandIDs.verifyData);
    panel.model?.metadataChanged.connect(update);
    panel.toolbar.insertAfter('cellType', 'fedmagicVerifyData', button);
    return new DisposableDelegate(() => {
      panel.model?.metadataChanged.disconnect(update);
      button.dispose();
    });
  }

  private _commands: CommandRegistry;
}

function notify(results: IVerifyResult[]): void {
  for (const result of results) {
    const where = result.task_id
      ? `${result.node} in task ${result.task_id}: `
      : '';
    if (result.passed) {
      Notification.success(`${where}data verified (${result.detail})`, {
        autoClose: 6000
      });
    } else {
      Notification.error(`${where}data verification failed: ${result.detail}`, {
        autoClose: false
      });
    }
  }
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'fedmagic:plugin',
  description:
    'Federated tasks in JupyterLab: the Federation panel and Verify data.',
  autoStart: true,
  requires: [INotebookTracker],
  optional: [ICommandPalette],
  activate: (
    app: JupyterFrontEnd,
    tracker: INotebookTracker,
    palette: ICommandPalette | null
  ) => {
    const federations = new Federations();
    const current = (): NotebookPanel | null => tracker.currentWidget;
    const notebookOf = (
      args: ReadonlyPartialJSONObject
    ): NotebookPanel | null =>
      typeof args.notebook === 'string'
        ? (tracker.find(panel => panel.id === args.notebook) ?? null)
        : current();
    const whyNotVerify = (panel: NotebookPanel | null): string | null => {
      if (panel === null) {
        return NO_NOTEBOOK;
      }
      const federation = federations.of(panel);
      return whyVerifyIsDisabled(federation.connected, federation.joins);
    };
    const isParticipantNotebook = (panel: NotebookPanel): boolean =>
      panel.model?.getMetadata('fedmagic') !== undefined ||
      federations.of(panel).joins.length > 0;

    const verify = async (panel: NotebookPanel): Promise<void> => {
      const why = whyNotVerify(panel);
      if (why !== null) {
        Notification.info(why, { autoClose: 6000 });
        return;
      }
      notify(await federations.of(panel).verifyData());
    };

    const sidePanel = new FederationPanel(async () => {
      const panel = current();
      if (panel) {
        await verify(panel);
      }
    });
    app.shell.add(sidePanel, 'right', { rank: 900 });
    const follow = (): void => {
      const panel = current();
      sidePanel.follow(panel, panel ? federations.of(panel) : null);
      app.commands.notifyCommandChanged();
    };
    tracker.currentChanged.connect(follow);
    follow();
    federations.changed.connect(() =>
      app.commands.notifyCommandChanged(CommandIDs.verifyData)
    );

    app.docRegistry.addWidgetExtension(
      'Notebook',
      new VerifyDataButton(app.commands)
    );

    app.commands.addCommand(CommandIDs.verifyData, {
      describedBy: NOTEBOOK_ARG,
      label: 'Verify Data of the Joined Tasks',
      caption: args => {
        const panel = notebookOf(args);
        return panel === null
          ? NO_NOTEBOOK
          : verifyTooltip(
              federations.of(panel).connected,
              federations.of(panel).joins
            );
      },
      icon: checkIcon,
      isEnabled: args => whyNotVerify(notebookOf(args)) === null,
      // In a notebook's toolbar: only in participant notebooks.
      isVisible: args => {
        if (args.notebook === undefined) {
          return true;
        }
        const panel = notebookOf(args);
        return panel !== null && isParticipantNotebook(panel);
      },
      execute: args => {
        const panel = notebookOf(args);
        return panel ? verify(panel) : undefined;
      }
    });
    app.commands.addCommand(CommandIDs.showPanel, {
      describedBy: NO_ARGS,
      label: 'Show the Federation Panel',
      execute: () => app.shell.activateById(sidePanel.id)
    });
    app.commands.addCommand(CommandIDs.stopTasks, {
      describedBy: NO_ARGS,
      label: "Stop This Notebook's Federated Tasks After Their Round",
      isEnabled: () => {
        const panel = current();
        return (
          !!panel &&
          federations.of(panel).tasks.some(t => t.status === 'running')
        );
      },
      execute: () => {
        const panel = current();
        if (panel) {
          const federation = federations.of(panel);
          federation.tasks
            .filter(t => t.status === 'running')
            .forEach(t => federation.stop(t.task_id));
        }
      }
    });
    app.commands.addCommand(CommandIDs.copyJoinLine, {
      describedBy: NO_ARGS,
      label: "Copy the Join Line of This Notebook's Task",
      isEnabled: () => {
        const panel = current();
        return !!panel && federations.of(panel).tasks.length > 0;
      },
      execute: () => {
        const panel = current();
        const task = panel
          ? taskToCopy(federations.of(panel).tasks)
          : undefined;
        if (task) {
          copyJoinLine(task);
        }
      }
    });
    if (palette) {
      for (const command of Object.values(CommandIDs)) {
        palette.addItem({ command, category: CATEGORY });
      }
    }
  }
};

export default plugin;
