import { ISessionContext } from '@jupyterlab/apputils';
import { Kernel, KernelMessage } from '@jupyterlab/services';
import { IDisposable } from '@lumino/disposable';
import { ISignal, Signal } from '@lumino/signaling';

/** The comm target fedmagic's kernel side opens when `%load_ext fedmagic` runs. */
export const COMM_TARGET = 'fedmagic';

export interface IParticipantRow {
  node: string;
  status: string;
  detail: string;
}

/** A task this kernel runs as its author. */
export interface ITaskState {
  task_id: string;
  status: 'running' | 'finished' | 'failed';
  error: string | null;
  stopping: boolean;
  round: number;
  max_rounds: number;
  participants: IParticipantRow[];
  metrics: Record<string, number | string>;
  join_command: string;
  /** Seconds since it started, until it ended. */
  elapsed: number;
  /** Seconds left, guessed from the rounds so far; null while unknown or once ended. */
  remaining: number | null;
  /** Where the model and history are saved. */
  checkpoint: string | null;
  /** What its strategy promises data owners about privacy, a line each; empty for none. */
  guarantees: string[];
  /** Epsilon spent so far, at `delta`; null where no budget is counted (yet). */
  epsilon: number | null;
  /** The most epsilon the task may spend; null for none. */
  target_epsilon: number | null;
  /** The delta epsilon is counted at; null where no budget is counted (yet). */
  delta: number | null;
  /** The last secure round's [updates in its sum, threshold t]; null for none. */
  secure_sum: [number, number] | null;
  /** A simulation's virtual participants in a line; null for a task of real ones. */
  simulated: string | null;
}

/**
 * A task this kernel has joined as a data owner: always about the code offered
 * in its current join, never about code accepted or verified in an earlier one.
 */
export interface IJoinState {
  task_id: string;
  node: string;
  status: 'running' | 'ended';
  /** What it does now: a first line that says it, any lines after it details. */
  detail: string;
  /** The code offered, once it arrived. */
  code_hash: string | null;
  /** Whether its data owner accepted this code. */
  accepted: boolean;
  /** Whether its data owner declined this code. */
  declined: boolean;
  /** Rounds this node took part in. */
  round: number;
  /** The rounds this code runs; null while unknown. */
  max_rounds: number | null;
  /** Verify data for this code; null before any. */
  verified: boolean | null;
  verification: string;
  /** What this code's strategy promises about privacy, a line each; empty for none. */
  guarantees: string[];
}

export interface IVerifyResult {
  passed: boolean;
  task_id: string | null;
  node: string | null;
  detail: string;
}

type Message =
  | { type: 'state'; tasks: ITaskState[]; joins: IJoinState[] }
  | { type: 'verified'; results: IVerifyResult[] };

const NOT_LOADED =
  "fedmagic is not loaded in this notebook's kernel: run %load_ext fedmagic first";

/**
 * The tasks one notebook's kernel runs and has joined, kept current over
 * fedmagic's comm.
 *
 * The kernel opens the comm when fedmagic loads; after a page reload the comm
 * is found again with `comm_info`. A restarted kernel starts with nothing.
 */
export class Federation implements IDisposable {
  constructor(sessionContext: ISessionContext) {
    this._sessionContext = sessionContext;
    sessionContext.kernelChanged.connect(this._onKernelChanged, this);
    sessionContext.statusChanged.connect(this._onStatusChanged, this);
    this._attach(sessionContext.session?.kernel ?? null);
  }

  /** Emitted when the tasks, the joins or the connection change. */
  get changed(): ISignal<this, void> {
    return this._changed;
  }

  /** Whether this kernel has fedmagic loaded (its comm is open). */
  get connected(): boolean {
    return this._comm !== null;
  }

  /** The tasks this kernel runs as their author, newest first. */
  get tasks(): readonly ITaskState[] {
    return this._tasks;
  }

  get joins(): readonly IJoinState[] {
    return this._joins;
  }

  /** When the tasks' state arrived (`Date.now()`), which their clocks count from. */
  get receivedAt(): number {
    return this._receivedAt;
  }

  /** The outcome of the last Verify data, until the next one. */
  get lastVerification(): readonly IVerifyResult[] {
    return this._lastVerification;
  }

  get isDisposed(): boolean {
    return this._isDisposed;
  }

  /** Run the joined tasks' `DatasetVerify` in the kernel, on its data. */
  verifyData(): Promise<IVerifyResult[]> {
    if (this._comm === null) {
      return Promise.resolve([
        { passed: false, task_id: null, node: null, detail: NOT_LOADED }
      ]);
    }
    const pending = new Promise<IVerifyResult[]>(resolve =>
      this._verifying.push(resolve)
    );
    this._comm.send({ action: 'verify' });
    return pending;
  }

  /** End an author's task after its current round (it keeps its checkpoint). */
  stop(taskId: string): void {
    this._comm?.send({ action: 'stop', task_id: taskId });
  }

  dispose(): void {
    if (this._isDisposed) {
      return;
    }
    this._isDisposed = true;
    this._sessionContext.kernelChanged.disconnect(this._onKernelChanged, this);
    this._sessionContext.statusChanged.disconnect(this._onStatusChanged, this);
    this._detach();
    Signal.clearData(this);
  }

  private _onKernelChanged(
    _: ISessionContext,
    change: { newValue: Kernel.IKernelConnection | null }
  ): void {
    this._attach(change.newValue);
  }

  private _onStatusChanged(_: ISessionContext, status: Kernel.Status): void {
    if (
      status === 'restarting' ||
      status === 'autorestarting' ||
      status === 'dead'
    ) {
      this._forget(); // the kernel's tasks and comm end with it
    }
  }

  private _attach(kernel: Kernel.IKernelConnection | null): void {
    this._detach();
    this._kernel = kernel;
    if (kernel === null) {
      return;
    }
    kernel.registerCommTarget(COMM_TARGET, this._onCommOpen);
    kernel
      .requestCommInfo({ target_name: COMM_TARGET })
      .then(reply => {
        const content = reply.content;
        if (
          content.status !== 'ok' ||
          this._kernel !== kernel ||
          this._comm !== null
        ) {
          return;
        }
        const ids = Object.keys(content.comms);
        if (ids.length > 0 && !kernel.hasComm(ids[ids.length - 1])) {
          const comm = kernel.createComm(COMM_TARGET, ids[ids.length - 1]);
          this._use(comm);
          comm.send({ action: 'refresh' });
        }
      })
      .catch(() => undefined); // a kernel that went away meanwhile: nothing to show
  }

  private _detach(): void {
    if (this._kernel !== null && !this._kernel.isDisposed) {
      this._kernel.removeCommTarget(COMM_TARGET, this._onCommOpen);
    }
    this._kernel = null;
    this._forget();
  }

  private _forget(): void {
    this._comm = null;
    this._tasks = [];
    this._joins = [];
    this._lastVerification = [];
    this._settleVerifying([
      { passed: false, task_id: null, node: null, detail: NOT_LOADED }
    ]);
    if (!this._isDisposed) {
      this._changed.emit();
    }
  }

  private _onCommOpen = (
    comm: Kernel.IComm,
    message: KernelMessage.ICommOpenMsg
  ): void => {
    this._use(comm);
    this._receive(message.content.data as unknown as Message);
  };

  private _use(comm: Kernel.IComm): void {
    this._comm = comm;
    comm.onMsg = message =>
      this._receive(message.content.data as unknown as Message);
    comm.onClose = () => {
      if (this._comm === comm) {
        this._forget();
      }
    };
    this._changed.emit();
  }

  private _receive(message: Message): void {
    if (message.type === 'state') {
      this._tasks = message.tasks ?? [];
      this._joins = message.joins ?? [];
      this._receivedAt = Date.now();
    } else if (message.type === 'verified') {
      this._lastVerification = message.results ?? [];
      this._settleVerifying(this._lastVerification);
    }
    this._changed.emit();
  }

  private _settleVerifying(results: readonly IVerifyResult[]): void {
    const waiting = this._verifying;
    this._verifying = [];
    waiting.forEach(resolve => resolve([...results]));
  }

  private _sessionContext: ISessionContext;
  private _kernel: Kernel.IKernelConnection | null = null;
  private _comm: Kernel.IComm | null = null;
  private _tasks: ITaskState[] = [];
  private _joins: IJoinState[] = [];
  private _receivedAt = Date.now();
  private _lastVerification: IVerifyResult[] = [];
  private _verifying: Array<(results: IVerifyResult[]) => void> = [];
  private _changed = new Signal<this, void>(this);
  private _isDisposed = false;
}
