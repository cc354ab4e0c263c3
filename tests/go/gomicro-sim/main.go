// Command gomicro-sim simulates N go-micro v4 services registering through the etcd registry at
// once, each as its own process would: its own etcd v3 Go client (its own connection and
// credentials, go-micro's 5 s dial timeout) running go-micro v4's etcd registry sequence. It is
// regcache's proof that a client nobody here wrote works against the host's etcd-compatible
// endpoint, and the load that shows what etcd sees from a fleet of such processes.
//
// The sequence is go-micro v4's registry/etcd (plugins/v4/registry/etcd/etcd.go):
//
//   - Register, first time (no cached lease): Get(nodePath, WithSerializable) looking for a
//     lease to reuse, then Grant(ttl) and Put(nodePath, json, WithLease).
//   - Register again every interval (go-micro's RegisterInterval): KeepAliveOnce(lease); when
//     the lease is gone (ErrLeaseNotFound) Grant and Put again; otherwise the node is unchanged
//     and nothing is written.
//   - GetService: Get(servicePath+"/", WithPrefix, WithSerializable), here after every
//     registration round.
//   - Watch: Watch(prefix, WithPrefix, WithPrevKV), one per process for its whole life.
//   - Deregister: Delete(nodePath), unless -no-deregister (a process killed without
//     deregistering: it exits without a word, its keys left to its lease).
//
// Keys are go-micro's: {prefix}{service}/{node id}, each part with "/" replaced by "-"; the value
// is a JSON Service with the one node. It prints one line of JSON (the Summary) on stdout.
//
// Where it departs from go-micro, and why: every call is bounded by -timeout (go-micro passes
// context.TODO() to KeepAliveOnce, which clientv3 3.4 retries forever while the endpoint is
// unavailable: a simulation must end); all processes connect first and register together (a
// fleet restarting at once, the case that hurts etcd); a connect failure counts instead of the
// nil-client panic go-micro would hit.
//
// Built offline in GOPATH mode from Debian's packages (golang-etcd-server-dev 3.4, whose client is
// go.etcd.io/etcd/clientv3): see tests/src/gomicro.rs for the environment.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path"
	"sort"
	"strings"
	"sync"
	"time"

	"go.etcd.io/etcd/clientv3"
	"go.etcd.io/etcd/etcdserver/api/v3rpc/rpctypes"
	"go.uber.org/zap"
)

// Service and Node are go-micro v4's registry types with their JSON tags: the value format the
// host must accept and return.
type Service struct {
	Name      string            `json:"name"`
	Version   string            `json:"version"`
	Metadata  map[string]string `json:"metadata"`
	Endpoints []interface{}     `json:"endpoints"`
	Nodes     []*Node           `json:"nodes"`
}

// Node is one instance of a service.
type Node struct {
	ID       string            `json:"id"`
	Address  string            `json:"address"`
	Metadata map[string]string `json:"metadata"`
}

type options struct {
	endpoints    []string
	n            int
	users        []string
	password     string
	duration     time.Duration
	interval     time.Duration
	ttl          int64
	timeout      time.Duration
	prefix       string
	service      string
	idPrefix     string
	noDeregister bool
	drain        time.Duration
}

func parseFlags() options {
	var o options
	endpoints := flag.String("endpoints", "127.0.0.1:2379", "comma-separated etcd endpoints")
	flag.IntVar(&o.n, "n", 10, "simulated processes, each with its own client and connection")
	users := flag.String("user", "", "user name; comma-separated names are given to the processes in turn (none: no auth)")
	flag.StringVar(&o.password, "password", "", "password of every user")
	flag.DurationVar(&o.duration, "duration", 5*time.Second, "how long each process stays registered")
	flag.DurationVar(&o.interval, "interval", time.Second, "go-micro's RegisterInterval: keep-alive and lookup period")
	flag.Int64Var(&o.ttl, "ttl", 5, "go-micro's RegisterTTL in seconds: the lease TTL")
	flag.DurationVar(&o.timeout, "timeout", 5*time.Second, "dial timeout and per-call timeout (go-micro's Timeout)")
	flag.StringVar(&o.prefix, "prefix", "/micro/registry/", "the registry prefix")
	flag.StringVar(&o.service, "service", "greeter", "service name every process registers")
	flag.StringVar(&o.idPrefix, "id-prefix", "", "node ids are {id-prefix}-{i} (default: {service}-{pid})")
	flag.BoolVar(&o.noDeregister, "no-deregister", false, "exit without deregistering or closing, as a killed process")
	flag.DurationVar(&o.drain, "drain", 2*time.Second, "after deregistering, how long watches wait for the others' deletes")
	flag.Parse()
	for _, e := range strings.Split(*endpoints, ",") {
		if e = strings.TrimSpace(e); e != "" {
			o.endpoints = append(o.endpoints, e)
		}
	}
	for _, u := range strings.Split(*users, ",") {
		if u = strings.TrimSpace(u); u != "" {
			o.users = append(o.users, u)
		}
	}
	if o.idPrefix == "" {
		o.idPrefix = fmt.Sprintf("%s-%d", o.service, os.Getpid())
	}
	if o.n < 1 || len(o.endpoints) == 0 || o.interval <= 0 || o.ttl < 1 {
		fmt.Fprintln(os.Stderr, "gomicro-sim: -n, -endpoints, -interval and -ttl must be positive")
		os.Exit(2)
	}
	return o
}

// nodePath and servicePath are go-micro's: path.Join drops the prefix's trailing slash.
func nodePath(prefix, service, id string) string {
	return path.Join(prefix, strings.Replace(service, "/", "-", -1), strings.Replace(id, "/", "-", -1))
}

func servicePath(prefix, service string) string {
	return path.Join(prefix, strings.Replace(service, "/", "-", -1))
}

// Summary is the one line printed at the end. Error texts are counted by text, so that a storm of
// one error stays one entry.
type Summary struct {
	Processes      int `json:"processes"`
	Connected      int `json:"connected"`
	Registered     int `json:"registered"`
	RegisterFailed int `json:"register_failed"`
	// Re-registrations after KeepAliveOnce found the lease gone (Grant + Put again).
	Reregistered     int `json:"reregistered"`
	KeepalivesOK     int `json:"keepalives_ok"`
	KeepalivesFailed int `json:"keepalives_failed"`
	Gets             int `json:"gets"`
	GetsFailed       int `json:"gets_failed"`
	// Nodes of the service the last successful Get of each process saw: fewest and most.
	LastGetNodesMin int `json:"last_get_nodes_min"`
	LastGetNodesMax int `json:"last_get_nodes_max"`
	// Watch events seen, summed over processes, and the fewest one process saw.
	WatchPuts          int            `json:"watch_puts"`
	WatchDeletes       int            `json:"watch_deletes"`
	WatchPutsMin       int            `json:"watch_puts_min"`
	WatchDeletesMin    int            `json:"watch_deletes_min"`
	WatchDeletesNoPrev int            `json:"watch_deletes_without_prev_kv"`
	WatchUndecodable   int            `json:"watch_undecodable"`
	WatchErrors        int            `json:"watch_errors"`
	Deregistered       int            `json:"deregistered"`
	DeregisterFailed   int            `json:"deregister_failed"`
	LeaseIDs           []int64        `json:"lease_ids"`
	Keys               []string       `json:"keys"`
	Errors             map[string]int `json:"errors"`
	// Since the start: when the last process connected, and when the last registered.
	ConnectMillisMax  int64 `json:"connect_ms_max"`
	RegisterMillisMax int64 `json:"register_ms_max"`
	ElapsedMillis     int64 `json:"elapsed_ms"`
	mu                sync.Mutex
}

func (s *Summary) fail(stage string, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.Errors[stage+": "+err.Error()]++
}

func (s *Summary) add(f func(s *Summary)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	f(s)
}

// process is one simulated go-micro service process.
type process struct {
	o       options
	sum     *Summary
	id      string
	key     string
	value   string
	client  *clientv3.Client
	lease   clientv3.LeaseID
	puts    int
	deletes int
	mu      sync.Mutex
	// Ends the watch; a process that exits as killed never calls it.
	stopWatch context.CancelFunc
}

func (p *process) call() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), p.o.timeout)
}

func (p *process) connect(i int, quiet *zap.Config, started time.Time) bool {
	cfg := clientv3.Config{
		Endpoints:   p.o.endpoints,
		DialTimeout: p.o.timeout,
		LogConfig:   quiet,
	}
	if len(p.o.users) > 0 {
		cfg.Username = p.o.users[i%len(p.o.users)]
		cfg.Password = p.o.password
	}
	c, err := clientv3.New(cfg)
	if err != nil {
		p.sum.fail("connect", err)
		return false
	}
	p.client = c
	elapsed := time.Since(started).Milliseconds()
	p.sum.add(func(s *Summary) {
		s.Connected++
		if elapsed > s.ConnectMillisMax {
			s.ConnectMillisMax = elapsed
		}
	})
	return true
}

// watch counts what the process's one watch sees until ctx ends.
func (p *process) watch(ctx context.Context, done chan<- struct{}) {
	defer close(done)
	for resp := range p.client.Watch(ctx, p.o.prefix, clientv3.WithPrefix(), clientv3.WithPrevKV()) {
		if err := resp.Err(); err != nil {
			if ctx.Err() == nil {
				p.sum.fail("watch", err)
				p.sum.add(func(s *Summary) { s.WatchErrors++ })
			}
			continue
		}
		for _, ev := range resp.Events {
			// go-micro's watcher decodes the value, or the previous value of a delete; an
			// event it cannot decode is skipped by it, so it is counted apart here.
			value := ev.Kv.Value
			if ev.Type == clientv3.EventTypeDelete {
				if ev.PrevKv == nil {
					p.sum.add(func(s *Summary) { s.WatchDeletesNoPrev++ })
					continue
				}
				value = ev.PrevKv.Value
			}
			var svc Service
			if json.Unmarshal(value, &svc) != nil || svc.Name == "" {
				p.sum.add(func(s *Summary) { s.WatchUndecodable++ })
				continue
			}
			p.mu.Lock()
			if ev.Type == clientv3.EventTypeDelete {
				p.deletes++
			} else {
				p.puts++
			}
			p.mu.Unlock()
		}
	}
}

// register is go-micro's registerNode: true when the node is registered after it.
func (p *process) register(first bool) bool {
	if first {
		// No cached lease: go-micro looks for the key and reuses its lease.
		ctx, cancel := p.call()
		rsp, err := p.client.Get(ctx, p.key, clientv3.WithSerializable())
		cancel()
		if err != nil {
			p.sum.fail("get node", err)
			return false
		}
		for _, kv := range rsp.Kvs {
			if kv.Lease > 0 {
				p.lease = clientv3.LeaseID(kv.Lease)
			}
		}
	}
	leaseNotFound := false
	if p.lease > 0 {
		ctx, cancel := p.call()
		_, err := p.client.KeepAliveOnce(ctx, p.lease)
		cancel()
		switch {
		case err == nil:
			p.sum.add(func(s *Summary) { s.KeepalivesOK++ })
		case err == rpctypes.ErrLeaseNotFound:
			leaseNotFound = true
		default:
			p.sum.fail("keepalive", err)
			p.sum.add(func(s *Summary) { s.KeepalivesFailed++ })
			return false
		}
		if !first && !leaseNotFound {
			return true // the node is unchanged: go-micro writes nothing
		}
	}
	ctx, cancel := p.call()
	defer cancel()
	lgr, err := p.client.Grant(ctx, p.o.ttl)
	if err != nil {
		p.sum.fail("grant", err)
		return false
	}
	if _, err := p.client.Put(ctx, p.key, p.value, clientv3.WithLease(lgr.ID)); err != nil {
		p.sum.fail("put", err)
		return false
	}
	p.lease = lgr.ID
	p.sum.add(func(s *Summary) {
		s.LeaseIDs = append(s.LeaseIDs, int64(lgr.ID))
		if leaseNotFound {
			s.Reregistered++
		}
	})
	return true
}

// getService is go-micro's GetService: the nodes of the service found.
func (p *process) getService() (int, bool) {
	ctx, cancel := p.call()
	defer cancel()
	rsp, err := p.client.Get(ctx, servicePath(p.o.prefix, p.o.service)+"/", clientv3.WithPrefix(), clientv3.WithSerializable())
	if err != nil {
		p.sum.fail("get service", err)
		return 0, false
	}
	nodes := 0
	for _, kv := range rsp.Kvs {
		var svc Service
		if json.Unmarshal(kv.Value, &svc) == nil {
			nodes += len(svc.Nodes)
		}
	}
	return nodes, true
}

func main() {
	o := parseFlags()
	// clientv3 logs every retry at warning level: with hundreds of clients that drowns the
	// summary's context. Errors are counted in the summary instead.
	quiet := zap.NewProductionConfig()
	quiet.Level = zap.NewAtomicLevelAt(zap.FatalLevel)
	quiet.OutputPaths = []string{"stderr"}
	quiet.ErrorOutputPaths = []string{"stderr"}

	sum := &Summary{Processes: o.n, Errors: map[string]int{}, LastGetNodesMin: -1, WatchPutsMin: -1, WatchDeletesMin: -1}
	started := time.Now()
	procs := make([]*process, o.n)
	for i := range procs {
		id := fmt.Sprintf("%s-%d", o.idPrefix, i)
		svc := Service{
			Name:      o.service,
			Version:   "1.0",
			Metadata:  map[string]string{"sim": "gomicro-sim"},
			Endpoints: []interface{}{},
			Nodes: []*Node{{
				ID:       id,
				Address:  fmt.Sprintf("127.0.0.1:%d", 10000+i),
				Metadata: map[string]string{"process": fmt.Sprint(i)},
			}},
		}
		value, _ := json.Marshal(svc)
		procs[i] = &process{o: o, sum: sum, id: id, key: nodePath(o.prefix, o.service, id), value: string(value)}
		sum.Keys = append(sum.Keys, procs[i].key)
	}

	// Phases, each awaited by every process: connect and open the watch; register and renew
	// for the duration; deregister; let the watches see the others' deletes.
	var connected, registered, deregistered, finished sync.WaitGroup
	for _, wg := range []*sync.WaitGroup{&connected, &registered, &deregistered, &finished} {
		wg.Add(o.n)
	}
	for i, p := range procs {
		go func(i int, p *process) {
			defer finished.Done()
			ok := p.connect(i, &quiet, started)
			var watchDone chan struct{}
			if ok {
				// Kept on the process, not in a local: a killed process never cancels it.
				var ctx context.Context
				ctx, p.stopWatch = context.WithCancel(context.Background())
				watchDone = make(chan struct{})
				go p.watch(ctx, watchDone)
			}
			connected.Done()
			connected.Wait()

			isRegistered := false
			lastNodes := -1
			if ok {
				deadline := time.Now().Add(o.duration)
				for round := 0; ; round++ {
					if p.register(!isRegistered) {
						if !isRegistered {
							elapsed := time.Since(started).Milliseconds()
							sum.add(func(s *Summary) {
								s.Registered++
								if elapsed > s.RegisterMillisMax {
									s.RegisterMillisMax = elapsed
								}
							})
						}
						isRegistered = true
					} else {
						sum.add(func(s *Summary) {
							if !isRegistered {
								s.RegisterFailed++
							}
						})
					}
					nodes, got := p.getService()
					sum.add(func(s *Summary) {
						if got {
							s.Gets++
						} else {
							s.GetsFailed++
						}
					})
					if got {
						lastNodes = nodes
					}
					if time.Now().Add(o.interval).After(deadline) {
						break
					}
					time.Sleep(o.interval)
				}
			}
			registered.Done()
			registered.Wait()

			if ok && isRegistered && !o.noDeregister {
				ctx, cancel := p.call()
				_, err := p.client.Delete(ctx, p.key)
				cancel()
				if err != nil {
					p.sum.fail("delete", err)
				}
				sum.add(func(s *Summary) {
					if err == nil {
						s.Deregistered++
					} else {
						s.DeregisterFailed++
					}
				})
			}
			deregistered.Done()
			deregistered.Wait()

			if ok && !o.noDeregister {
				// Bounded: a delete the endpoint holds back (or loses) ends the wait at -drain.
				want := 0
				sum.add(func(s *Summary) { want = s.Deregistered })
				until := time.Now().Add(o.drain)
				for time.Now().Before(until) {
					p.mu.Lock()
					seen := p.deletes
					p.mu.Unlock()
					if seen >= want {
						break
					}
					time.Sleep(20 * time.Millisecond)
				}
			}
			if ok && !o.noDeregister {
				p.stopWatch()
				<-watchDone
				p.client.Close()
			}
			p.mu.Lock()
			puts, deletes := p.puts, p.deletes
			p.mu.Unlock()
			sum.add(func(s *Summary) {
				s.WatchPuts += puts
				s.WatchDeletes += deletes
				if s.WatchPutsMin < 0 || puts < s.WatchPutsMin {
					s.WatchPutsMin = puts
				}
				if s.WatchDeletesMin < 0 || deletes < s.WatchDeletesMin {
					s.WatchDeletesMin = deletes
				}
				if lastNodes >= 0 {
					if s.LastGetNodesMin < 0 || lastNodes < s.LastGetNodesMin {
						s.LastGetNodesMin = lastNodes
					}
					if lastNodes > s.LastGetNodesMax {
						s.LastGetNodesMax = lastNodes
					}
				}
			})
		}(i, p)
	}
	finished.Wait()

	sum.mu.Lock()
	sum.ElapsedMillis = time.Since(started).Milliseconds()
	sort.Slice(sum.LeaseIDs, func(a, b int) bool { return sum.LeaseIDs[a] < sum.LeaseIDs[b] })
	line, err := json.Marshal(sum)
	sum.mu.Unlock()
	if err != nil {
		fmt.Fprintln(os.Stderr, "gomicro-sim:", err)
		os.Exit(1)
	}
	fmt.Println(string(line))
	// A killed process leaves its connections to the kernel: no Close, no revoke.
	os.Exit(0)
}
