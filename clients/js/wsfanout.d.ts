// Type declarations for wsfanout.js, the JavaScript client of wsfanout (DESIGN section 11).

/** A stream's epoch and the offset of the last message the client gave the application. */
export interface Position {
  epoch: string;
  offset: number;
}

/** stream name ("all", "group:<name>", "user:<username>") -> position */
export type Positions = Record<string, Position>;

export type State = "connecting" | "connected" | "disconnected" | "closed";

/**
 * Why the state changed. connecting: null (the first attempt) or "retry". connected: null.
 * disconnected (a timer will try again): "going_away" (1001), "restart" (1012), "slow_consumer"
 * (1013), "unauthorized" (1008 or a refused credential: trying once more with getToken()),
 * "connection_lost" (any other close), "unreachable" (no answer from the server), "refused"
 * (the server is up and takes the credentials, yet refused the handshake), "token_failed"
 * (getToken() threw), "timeout" (no welcome within connectTimeout).
 * closed: "closed" (close() was called) or "unauthorized" (refused for good).
 */
export type Reason =
  | "retry"
  | "going_away"
  | "restart"
  | "slow_consumer"
  | "flooded"
  | "unauthorized"
  | "connection_lost"
  | "unreachable"
  | "refused"
  | "token_failed"
  | "timeout"
  | "closed";

export interface Welcome {
  type: "welcome";
  user: string;
  first_name?: string;
  groups: string[];
  streams?: Positions;
}

export interface Message {
  type: "message";
  kind: "broadcast" | "group" | "direct";
  stream?: string;
  offset?: number;
  from: string;
  via?: string;
  group?: string;
  to?: string;
  text: string;
  ts: number;
}

export interface Resumed {
  type: "resumed";
  recovered: boolean;
  /** how many messages were replayed */
  missed: number;
  /** streams whose missed messages could not be replayed: refetch them */
  lost: string[];
  /** added by the client: lost streams whose new epoch stands at offset 0 (the server's
   * history restarted and nothing was published since: nothing was missed in it) */
  restarted: string[];
  /** added by the client: the server refused the saved positions, which were dropped */
  refused?: boolean;
}

export interface Membership {
  type: "joined" | "left";
  group: string;
}

export interface Arrival {
  type: "online" | "offline";
  user: string;
  group: string;
}

export interface ErrorEvent {
  type: "error";
  code: string;
  detail?: string;
  id?: string;
}

export interface Ack {
  type: "ack";
  id: string;
}

export interface PresenceAnswer {
  type: "presence";
  group: string;
  online: string[];
  count: number;
  events?: boolean;
  id: string;
}

export interface HistoryAnswer {
  type: "history";
  stream: string;
  epoch?: string;
  offset?: number;
  messages: Message[];
  id: string;
}

export type Event = Welcome | Message | Resumed | Membership | Arrival | ErrorEvent;

export interface EventMap {
  welcome: Welcome;
  message: Message;
  resumed: Resumed;
  joined: Membership;
  left: Membership;
  online: Arrival;
  offline: Arrival;
  error: ErrorEvent;
  event: Event;
}

export type Frame =
  | { type: "broadcast"; text: string }
  | { type: "group"; group: string; text: string }
  | { type: "direct"; user_name: string; text: string }
  | { type: string; [field: string]: unknown };

export interface ClientOptions {
  /** a connection token (JWT), sent as ?token= */
  token?: string;
  /** called before each connection attempt, and again after a refusal for auth */
  getToken?: () => string | Promise<string>;
  /** where to resume from, as `positions` was saved */
  positions?: Positions;
  /** seconds: the first backoff's ceiling (0.5) */
  minDelay?: number;
  /** seconds: the backoff's ceiling (20) */
  maxDelay?: number;
  /** seconds a connection must live for the backoff to start afresh (10) */
  resetAfter?: number;
  /** seconds send(), presence() and history() wait for their answer (10) */
  requestTimeout?: number;
  /** seconds an attempt may take, from the handshake to the welcome (10) */
  connectTimeout?: number;
  /** a WebSocket constructor (default globalThis.WebSocket), e.g. from the `ws` package */
  WebSocket?: new (url: string) => unknown;
}

/** A refused request: the server's error code, "timeout" or "disconnected". */
export declare class ClientError extends Error {
  readonly code: string;
  readonly detail: string;
  readonly event?: ErrorEvent;
  constructor(code: string, detail?: string, event?: ErrorEvent);
}

/** A full-jitter backoff delay in seconds: random in [0, min(maxDelay, minDelay * 2^attempt)). */
export declare function backoff(
  attempt: number,
  minDelay?: number,
  maxDelay?: number,
  random?: () => number,
): number;

export declare class Client {
  /** `url` may be relative, or omitted in a page (the socket at the page's own path). */
  constructor(url?: string | URL | null, options?: ClientOptions);
  constructor(options: ClientOptions);
  readonly state: State;
  /** Why the state is what it is (the last "state" event's reason). */
  readonly reason: Reason | null;
  /** a copy of where each stream stands, to save and pass back as `positions` */
  readonly positions: Positions;
  connect(): this;
  close(): void;
  on(name: "state", listener: (state: State, reason: Reason | null) => void): this;
  on<K extends keyof EventMap>(name: K, listener: (event: EventMap[K]) => void): this;
  off(name: "state", listener: (state: State, reason: Reason | null) => void): this;
  off<K extends keyof EventMap>(name: K, listener: (event: EventMap[K]) => void): this;
  send(frame: Frame): Promise<Ack>;
  presence(group: string): Promise<PresenceAnswer>;
  history(stream: string, limit?: number): Promise<HistoryAnswer>;
}
