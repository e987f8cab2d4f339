import { Clipboard, Notification } from '@jupyterlab/apputils';
import { NotebookPanel } from '@jupyterlab/notebook';
import { LabIcon } from '@jupyterlab/ui-components';
import { Widget } from '@lumino/widgets';

import { Federation, IJoinState, ITaskState } from './federation';

const FEDERATION_SVG =
  '<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">' +
  '<g class="jp-icon3" fill="#616161"><circle cx="12" cy="4" r="3"/><circle cx="4" cy="19" r="3"/>' +
  '<circle cx="20" cy="19" r="3"/><path d="M11 7h2v5.4l5.2 4.2-1.3 1.5L12 14.2l-4.9 3.9-1.3-1.5 ' +
  '5.2-4.2z"/></g></svg>';

export const federationIcon = new LabIcon({
  name: 'fedmagic:federation',
  svgstr: FEDERATION_SVG
});

/**
 * The Federation side panel: the tasks the current notebook's kernel runs or
 * has joined, with status, round, participants, last metrics, the join line
 * to copy, Stop, and Verify data.
 */
export class FederationPanel extends Widget {
  constructor(verify: () => Promise<void>) {
    super();
    this._verify = verify;
    this.id = 'fedmagic-federation';
    this.addClass('fedmagic-FederationPanel');
    this.title.icon = federationIcon;
    this.title.caption = 'Federation: the tasks of this notebook';
    this.render();
  }

  /** Follow another notebook (or none). */
  follow(notebook: NotebookPanel | null, federation: Federation | null): void {
    this._federation?.changed.disconnect(this.render, this);
    this._notebook = notebook;
    this._federation = federation;
    federation?.changed.connect(this.render, this);
    this.render();
  }

  render(): void {
    const node = this.node;
    node.replaceChildren(element('h2', 'Federation'));
    const federation = this._federation;
    if (this._notebook === null || federation === null) {
      node.append(
        element(
          'p',
          'Open a notebook to see its federated tasks.',
          'fedmagic-hint'
        )
      );
      return;
    }
    node.append(
      element('div', this._notebook.title.label, 'fedmagic-notebook')
    );
    if (!federation.connected) {
      node.append(
        element(
          'p',
          "This notebook's kernel has not loaded fedmagic: run " +
            '%load_ext fedmagic to author or join a task.',
          'fedmagic-hint'
        )
      );
      return;
    }
    if (federation.tasks.length === 0 && federation.joins.length === 0) {
      node.append(
        element(
          'p',
          'No task yet: run a %%fedavg_task cell to start one, or ' +
            '%fedavg_join to join one.',
          'fedmagic-hint'
        )
      );
    }
    federation.tasks.forEach(task =>
      node.append(this._taskCard(federation, task))
    );
    federation.joins.forEach(join => node.append(this._joinCard(join)));
  }

  protected onBeforeShow(): void {
    this.render();
  }

  private _taskCard(federation: Federation, task: ITaskState): HTMLElement {
    const card = element(
      'section',
      '',
      `fedmagic-TaskCard fedmagic-status-${task.status}`
    );
    card.dataset.taskId = task.task_id;
    const state = task.stopping ? 'stopping after this round' : task.status;
    card.append(
      element('h3', `${task.task_id}`),
      row('status', task.error ? `${state}: ${task.error}` : state),
      row('round', `${task.round} / ${task.max_rounds || '?'}`),
      row('participants', participantsText(task)),
      row('last metrics', metricsText(task.metrics) || 'none yet')
    );
    const join = element('code', task.join_command, 'fedmagic-join-line');
    const copy = button('Copy join line', () => copyJoinLine(task));
    const stop = button('Stop after this round', () =>
      federation.stop(task.task_id)
    );
    stop.disabled = task.status !== 'running' || task.stopping;
    card.append(join, element('div', '', 'fedmagic-actions'));
    card.lastElementChild!.append(copy, stop);
    return card;
  }

  private _joinCard(join: IJoinState): HTMLElement {
    const card = element(
      'section',
      '',
      `fedmagic-JoinCard fedmagic-status-${join.status}`
    );
    card.dataset.taskId = join.task_id;
    const verification =
      join.verified === null
        ? 'not verified yet'
        : `${join.verified ? 'passed' : 'failed'}: ${join.verification}`;
    card.append(
      element('h3', `${join.task_id} (as ${join.node})`),
      row('status', join.detail || join.status),
      row('round', `${join.round} / ${join.max_rounds}`),
      row(
        'code',
        join.code_hash
          ? `${join.code_hash.slice(0, 16)}, ` +
              (join.accepted ? 'accepted' : 'not accepted yet')
          : 'not received yet'
      ),
      row(
        'data',
        verification,
        join.verified === false ? 'fedmagic-failed' : ''
      )
    );
    const verify = button('Verify data', () => void this._verify());
    card.append(element('div', '', 'fedmagic-actions'));
    card.lastElementChild!.append(verify);
    return card;
  }

  private _verify: () => Promise<void>;
  private _notebook: NotebookPanel | null = null;
  private _federation: Federation | null = null;
}

/** Put a task's join line on the clipboard, for its author to send to data owners. */
export function copyJoinLine(task: ITaskState): void {
  Clipboard.copyToSystem(task.join_command);
  Notification.info(`Join line of task ${task.task_id} copied`, {
    autoClose: 3000
  });
}

function participantsText(task: ITaskState): string {
  if (task.participants.length === 0) {
    return 'none yet';
  }
  const counts = new Map<string, number>();
  task.participants.forEach(p =>
    counts.set(p.status, (counts.get(p.status) ?? 0) + 1)
  );
  return (
    `${task.participants.length} (` +
    [...counts].map(([status, count]) => `${count} ${status}`).join(', ') +
    ')'
  );
}

function metricsText(metrics: Record<string, number | string>): string {
  return Object.entries(metrics)
    .map(
      ([name, value]) =>
        `${name} ${typeof value === 'number' ? Number(value.toPrecision(4)) : value}`
    )
    .join(', ');
}

function element(tag: string, text: string, className = ''): HTMLElement {
  const node = document.createElement(tag);
  node.textContent = text;
  if (className) {
    node.className = className;
  }
  return node;
}

function row(label: string, value: string, className = ''): HTMLElement {
  const line = element('div', '', `fedmagic-row ${className}`.trim());
  line.append(element('span', label, 'fedmagic-label'), element('span', value));
  return line;
}

function button(label: string, onClick: () => void): HTMLButtonElement {
  const node = element(
    'button',
    label,
    'jp-Button jp-mod-styled jp-mod-reject'
  ) as HTMLButtonElement;
  node.addEventListener('click', onClick);
  return node;
}
